"""The training application: pretraining (`mae-fast pretrain`), its data, the linear probe and the
pictures (reconstruction grids, loss curves)."""
