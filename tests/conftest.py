import os
import sys

# the repo root, so tests import train_wan, common, data as a user's script would
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
