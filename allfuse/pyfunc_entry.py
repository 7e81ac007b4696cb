"""MLflow's entry point for the allfuse pyfunc model (models from code): MLflow runs this file when
it loads a packaged model; it is not imported by allfuse itself. See allfuse.serving."""

import mlflow

from allfuse.serving import PyfuncModel

mlflow.models.set_model(PyfuncModel())
