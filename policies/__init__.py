"""May this change be committed? Evaluation suites, metrics, the gate and its YAML policies."""
