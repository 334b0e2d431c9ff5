"""prompts_store package."""
