"""Adapters: loading PEFT directories, slots, and the masked-LoRA op installed on target nn.Linears."""
