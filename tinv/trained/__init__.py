"""What trains: the token's vectors (token.py) and the LoRA of method=pivotal (lora.py), each a part (tinv.parts)."""
