"""The MLflow code: a sweep's runs, the journaled writer, the trial reporter, records read back."""
