"""medtransfer: ImageNet vs RadImageNet transfer learning for medical imaging, tracked in MLflow and DVC."""

import os as _os

__version__ = "0.1.0"

#: $MLFLOW_TRACKING_URI as this process found it. Read here, before any MLflow call: MLflow exports every URI it is
#: given to that variable, so a later read cannot tell the user's setting from our own. `tracking.use_tracking_store`
#: names it when the study logs elsewhere.
MLFLOW_TRACKING_URI_AT_START = _os.environ.get("MLFLOW_TRACKING_URI")
