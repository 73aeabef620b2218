"""What a sweep needs beyond one run: the recipe search's trial (:mod:`.trial`), Hydra launchers
that skip finished runs (:mod:`.launchers`) and the recipe search's Optuna study (:mod:`.study`,
its loop in :mod:`.search`). The classes Hydra instantiates are in ``hydra_plugins/spon_exp_launchers``
(Hydra finds plugins only there); they combine these with Hydra's and submitit's classes."""
