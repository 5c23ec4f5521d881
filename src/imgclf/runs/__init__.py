"""Run folders: layout, status, logs, and train_run() which produces one."""
