"""Write small TFRecord files with TensorFlow's own writer and Example protos, for
tests/interop/test_tfrecord.py (which reads them without TensorFlow).

Run from the repo root with the TensorFlow reference environment:
    /work/venvs/tf/bin/python tests/interop/tfrecord/make_fixtures.py
Writes tests/interop/tfrecord/tf_written.tfrecord (a few records of every Feature kind, including
negative and large int64 values and an empty list) and tf_written.json (the values put in).
"""

import json
import os

import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    records = [
        {"ints": [0, 1, 127, 128, 300, 2**31, -1, -(2**63), 2**63 - 1], "floats": [0.5, -1.25, 3e38],
         "strings": ["a", "", "héllo"], "empty": []},
        {"ints": [], "floats": [1.0], "strings": [], "empty": []},
        {"ints": [7] * 200, "floats": [0.1] * 3, "strings": ["x" * 300], "empty": []},
    ]
    path = os.path.join(HERE, "tf_written.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for r in records:
            feature = {
                "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=r["ints"])),
                "floats": tf.train.Feature(float_list=tf.train.FloatList(value=r["floats"])),
                "strings": tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode() for s in r["strings"]])),
                "empty": tf.train.Feature(int64_list=tf.train.Int64List(value=r["empty"])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with open(os.path.join(HERE, "tf_written.json"), "w") as f:
        json.dump(records, f, indent=1)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
