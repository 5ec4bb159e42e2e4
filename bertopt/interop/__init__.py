"""Reading and writing other tools' formats without their frameworks (TFRecord shards, Google's
pretraining data)."""
