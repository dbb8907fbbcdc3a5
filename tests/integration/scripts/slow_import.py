"""A module slow to import, for --preload tests: it sleeps SLOW_IMPORT_S seconds, then writes the
time it finished to the file SLOW_IMPORT_DONE."""
import os
import time

time.sleep(float(os.environ.get("SLOW_IMPORT_S", "0")))
if os.environ.get("SLOW_IMPORT_DONE"):
    with open(os.environ["SLOW_IMPORT_DONE"], "w") as out:
        out.write(repr(time.time()))
