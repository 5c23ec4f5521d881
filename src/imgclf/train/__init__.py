"""Training: plain loops for the head, stage-2 fine-tuning on cached prefix activations, the training classifier."""
