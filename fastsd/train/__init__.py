"""The two-stage DreamBooth trainer with exact resume."""
