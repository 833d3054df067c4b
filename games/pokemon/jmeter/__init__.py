"""JMeter plans of the game (see plans.py and README.md)."""
