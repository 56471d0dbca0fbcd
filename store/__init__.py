"""What is kept, and how is it brought back: base models, checkpoints, the version store, the ledger."""
