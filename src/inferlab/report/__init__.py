"""The study's answer: report, Pareto frontier, recommendation (stage `report`)."""
