"""The numbers: intervals, tests and the one bootstrap (:mod:`.inference`), scores of a
predictor on a labelled set (:mod:`.scoring`) and the run's side of conformal prediction
sets (:mod:`.conformal_sets`)."""
