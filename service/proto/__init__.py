"""Generated protocol modules (scripts/gen_protos.sh)."""
