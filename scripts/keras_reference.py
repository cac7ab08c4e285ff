"""A Keras classifier deployed as TensorFlow writes it, for tests/test_deployed_models.py.

TensorFlow is not in the project's environment (its environment takes 1.6 GB), so this runs in
its own and only its output is committed (tests/data/keras_cnn/): a small Keras CNN trained on
the synthetic shapes (tests/synthetic.py: the object's colour is the class), as tf2onnx
converts it (`model.onnx`), as Keras exports it for TensorFlow Serving (`saved_model/`), as
TensorFlow Lite converts it (`model.tflite`) and as its full-integer quantisation gives it to
edge accelerators (`model_int8.tflite`: u8 in, u8 out),
with held-out images, their object masks, Keras' own probabilities on them and TensorFlow
Lite's from the integer model:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfenv/bin/python scripts/keras_reference.py tests/data/keras_cnn

What Keras models are, and the exporter must take as they are: float NHWC input in 0..1 here
(`--scale 255`), BatchNormalization folded by the converters, a final Softmax.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.synthetic import CLASSES, SIZE, make_dataset  # noqa: E402  (numpy only)


def build_and_train(seed: int = 0):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 3), name="image"),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same"),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(len(CLASSES), activation="softmax"),
    ])
    images, labels, _ = make_dataset(1200, seed=11)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images.astype(np.float32) / 255, labels, epochs=6, batch_size=32, verbose=2)
    return model


def int8_probabilities(tflite: Path, images: np.ndarray) -> np.ndarray:
    """TensorFlow Lite's own probabilities from the integer model, dequantised: its input is
    the images in 0..1 quantised with the input's scale and zero point."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(str(tflite))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (in_scale, in_zero), (out_scale, out_zero) = source["quantization"], target["quantization"]
    rows = []
    for image in images:
        levels = np.round(image[None].astype(np.float32) / 255 / in_scale + in_zero)
        interpreter.set_tensor(source["index"], levels.clip(0, 255).astype(np.uint8))
        interpreter.invoke()
        rows.append((interpreter.get_tensor(target["index"]).astype(np.float32) - out_zero)
                    * out_scale)
    return np.concatenate(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    import tensorflow as tf
    import tf2onnx

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_and_train()
    images, labels, masks = make_dataset(24, seed=12)
    probabilities = model.predict(images.astype(np.float32) / 255, verbose=0)
    accuracy = float((probabilities.argmax(1) == labels).mean())
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):
        return {"probabilities": model(image, training=False)}

    # through a tf.function: tf2onnx 1.17's from_keras does not read Keras 3 models
    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17,
                                  output_path=str(args.out / "model.onnx"))
    calibration = make_dataset(200, seed=13)[0].astype(np.float32) / 255
    saved = str(args.out / "saved_model")  # as TensorFlow Serving loads it
    shutil.rmtree(saved, ignore_errors=True)
    model.export(saved)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)  # as TensorFlow's docs do
    (args.out / "model.tflite").write_bytes(converter.convert())
    # full-integer quantisation, as edge accelerators take it: u8 in, u8 out
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    (args.out / "model_int8.tflite").write_bytes(converter.convert())
    np.savez_compressed(args.out / "reference.npz", images=images, labels=labels, masks=masks,
                        probabilities=probabilities,
                        int8_probabilities=int8_probabilities(args.out / "model_int8.tflite",
                                                              images))
    (args.out / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (args.out / "versions.json").write_text(json.dumps(
        {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__,
         "held_out_accuracy": accuracy}, indent=2) + "\n")
    print(f"held-out accuracy {accuracy:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
