"""piaa-dist: BLG-PIAA personalized image aesthetics, meta-trained at scale.

Layers import one way:

* math (``model``, ``meta``, ``metrics``, ``data.decode``, ``data.synth``): plain PyTorch/NumPy,
  never ray, mlflow or boto3;
* data plane (``storage``, ``data.readers``, ``data.images``, ``data.tarfmt``, ``data.manifest``,
  ``data.layout``, ``data.ingest``, ``data.stream``, ``data.verify``): files and S3;
* training (``train``, ``evaluate``, ``checkpoint``): single-process loops over the math;
* orchestration (``orchestration.*``): the only place that imports Ray Train/Tune and MLflow;
* entry points (``cli``, ``commands.*``, ``jobs/``): thin.
"""

__version__ = "0.1.0"
