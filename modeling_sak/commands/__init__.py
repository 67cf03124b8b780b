"""The package's commands, each a console script (setup.cfg) and a module (`python -m modeling_sak.commands.NAME`):

- `sak-predict` (`predict`): pictures and arrays of a checkpoint's predictions for images;
- `sak-evaluate` (`evaluate_model`): a checkpoint's metrics on a dataset split, with pictures;
- `sak-convert` (`convert_original_sak`): the authors' checkpoints as SAK checkpoints;
- `sak-prepare-dataset` (`prepare_dataset`): NYUD-v2, PASCAL-Context or ToyRooms in the package's schema;
- `sak-publish` (`publish`): a checked checkpoint or dataset folder pushed to the Hub;
- `sak-export-onnx` (`export_onnx`): a checkpoint as ONNX, checked against ONNX Runtime;
- `sak-train-specialists` (`train_specialists`): the two ToyRooms specialist teachers.

Each ends a bad input with one `PROG: error: MESSAGE` line and exit status 2 (`modeling_sak.cli`). Training is
`accelerate launch train_accelerate.py` at the repository's top.
"""
