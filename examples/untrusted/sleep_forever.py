# Resource attack: hold a worker forever.
import time

time.sleep(10**9)
