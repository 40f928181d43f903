"""The user's commands: the command line (:mod:`.cli`), ``evaluate``, ``calibrate`` and
the one output guard every command that writes goes through (:mod:`.outputs`)."""
