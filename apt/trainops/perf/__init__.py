"""Performance model: step time, tokens/s, MFU and goodput of a layout on a GPU cluster,
without the cluster (hardware.yaml's datasheet constants, compute.py, comms.py, predict.py),
checked against published runs (published.py) and calibrated from a measurement
(calibration.py). `trainops plan --gpu ...` prints it; `--search` ranks layouts."""
from .hardware import Hardware, load_hardware
from .predict import Prediction, predict
from .shape import Layout, ModelShape, layout_from_plan, shape_from_config

__all__ = ["Hardware", "Layout", "ModelShape", "Prediction", "layout_from_plan", "load_hardware",
           "predict", "shape_from_config"]
