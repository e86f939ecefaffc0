"""Public fused ops. Each is a torch.library custom op under mae_fast:: with a fake (meta)
implementation and autograd, so it works with torch.compile(fullgraph=True)."""
