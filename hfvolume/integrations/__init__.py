"""Where users meet hfvolume: the Trainer callback, the ``evaluate`` metric, the command line and model cards."""
