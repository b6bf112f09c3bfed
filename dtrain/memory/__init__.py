"""Memory accounting: real-tensor breakdowns (measure) and arithmetic estimates (estimate)."""
