"""TensorProtos for the serving tests: a declared shape that need not match the values sent."""

import tensorflow as tf
from tensorflow.core.framework import tensor_pb2


def declared(shape, values, dtype=tf.string):
    """A TensorProto declaring ``shape`` that carries ``values`` (e.g. one value for 10^7 elements)."""
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    if dtype == tf.string:
        proto.string_val.extend(values)
    else:
        proto.int64_val.extend(values)
    return proto
