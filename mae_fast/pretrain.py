"""`python -m mae_fast.pretrain` (as `torchrun ... -m mae_fast.pretrain`): mae_fast.train.pretrain."""
from .train.pretrain import main

if __name__ == "__main__":
    main()
