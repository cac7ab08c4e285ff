"""The `xaiserve` subcommands, one module each: `add_parser(sub)` declares its options and sets
`run`, which turns them into library calls and the outcome into an exit code and one line."""

from . import bench, evaluate, explain, export, health, models, serve

# in the order `xaiserve --help` lists them
COMMANDS = (export, serve, explain, models, health, bench, evaluate)
