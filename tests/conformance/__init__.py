"""Conformance suite: differential fuzzing of pollguard's upstream client against h11.
(Allowed divergences are documented here once the suite settles.)"""
