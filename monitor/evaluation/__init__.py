"""Offline evaluation of detection quality on labelled data sets."""
