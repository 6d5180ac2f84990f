"""python -m dynmoe_dist.train [hydra overrides...]"""

from ..cli import train

if __name__ == "__main__":
    train()
