"""Dynamics studies (also runnable as `chronomoe-dyn study NAME`)."""
