"""The web UI (`python ui.py`): Gradio pages in front of the same scripts and files the CLI uses.

The pages (dataset_page.py, train_page.py, runs_page.py, assembled by app.py) hold no training
logic: they edit caption files, write the dataset TOML and the `--config_file` TOML the CLI reads
(dataset_files.py, run_config.py), start the real `<family>_train_network.py` as a child process and
stop it with SIGINT (run_process.py), and read a run's progress back from its folder: TensorBoard
logs, sample images, LoRA files, the log (run_folder.py). Everything but the pages is plain Python,
tested without a browser.
"""
