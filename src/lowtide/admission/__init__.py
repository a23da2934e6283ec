"""Admission: when may a request go to an engine? Budgets, an adaptive window, fair share."""
