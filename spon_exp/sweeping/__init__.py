"""What a sweep needs beyond one run: the recipe search's trial (:mod:`.trial`)."""
