"""Small built-in data and loaders: word-level tasks for instruction vectors, knowledge-edit records (CounterFact, ZsRE, the built-in counterfactuals)."""
