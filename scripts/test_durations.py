"""Write tests/durations.json (test id -> seconds, tests of 1 s or more) from a JUnit XML report of a full run
(`make test PYTEST_ARGS=--junitxml=FILE`, or CI's). `tests/conftest.py` starts the slowest tests first, so
the two pytest workers end together; a test missing from the file counts as 1 s.

    python scripts/test_durations.py FILE
"""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(report: str) -> None:
    durations = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        seconds = float(case.get("time") or 0)
        if module and seconds >= 1:
            durations[f"{module}.py::{case.get('name')}"] = round(seconds, 1)
    out = Path(__file__).resolve().parent.parent / "tests" / "durations.json"
    out.write_text(json.dumps(dict(sorted(durations.items())), indent=0) + "\n")
    print(f"{out}: {len(durations)} tests, {sum(durations.values()):.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
