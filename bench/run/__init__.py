"""The run: its directory and layout (:mod:`.rundir`), preparation and resume
(:mod:`.prepare`), the ordered stages (:mod:`.runner`, :mod:`.context`), work units and
their scheduling (:mod:`.units`, :mod:`.scheduling`, :mod:`.storage`), tuning
(:mod:`.tuning`), the leaderboard (:mod:`.leaderboard`) and the saved predictor
(:mod:`.saving`)."""
