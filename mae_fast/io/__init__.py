"""Files and other libraries' key names: safe checkpoint reading and atomic, checksummed writing (files),
loading into a model with position-table interpolation (checkpoint), Hugging Face ViTMAE
(hf_keys, hf) and timm (timm). Works on state dicts and any nn.Module: imports no model code."""
