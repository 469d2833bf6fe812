"""The code of the registered embedding model (an MLflow "model from code"; not meant to be imported).

:func:`vlalign.tracking.mlflow.log_embedder` passes this file's path as ``python_model``. MLflow copies it into
the model folder and runs it when the model is loaded, instead of unpickling a ``python_model.pkl``. It only
imports the embedder from the installed ``vlalign`` package (no ``code_paths`` are logged), so loading a
version needs ``vlalign`` installed and runs no code but this file and the package's own modules.
"""

import mlflow

from vlalign.tracking.mlflow import VLAlignEmbedder

mlflow.models.set_model(VLAlignEmbedder())
