"""Data: the datasets a run reads (:mod:`.datasets`, :mod:`.sources`), external and
evaluation sets (:mod:`.external_data`), downloads (:mod:`.download`) and the stratified,
grouped folds (:mod:`.folds`)."""
