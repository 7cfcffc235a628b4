"""`python -m utils.env_check`: compile Jittor if needed and print the device / oneDNN line.

Run once after installing: the first `import jittor` compiles Jittor's core (minutes on
a small machine), which is better done here than inside the first test or training run.
"""
from utils import runtime

if __name__ == "__main__":
    runtime.activate(verbose=True)
