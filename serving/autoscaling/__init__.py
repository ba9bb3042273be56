"""Autoscaling on LLM signals: settings (what ops write), the policy (plain Python), the Ray
adapter (the only part that knows Ray) and the what-if simulator."""
