"""Request-path policies: plain Python over plain data, no Ray, no vLLM."""
