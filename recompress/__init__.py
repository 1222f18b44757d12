"""recompress: trained recommender checkpoint -> compressed tables -> ONNX/TensorRT -> measured frontier."""

__version__ = "0.1.0"
