"""python -m dynmoe_dist.train [hydra overrides...]"""

from .app import main

if __name__ == "__main__":
    main()
