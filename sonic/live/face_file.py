"""Prepare a live face in this interpreter and write it to a file, for a process that cannot load
the face landmarker itself (the Pipecat integration's environment: its protobuf is too new for
MediaPipe; integrations/pipecat/).

    python -m sonic.live.face_file PORTRAIT OUT.pkl ['{"min_resolution": 256}']

The file holds the prepared face (framing, rig, warp decoder) and the validated options, pickled:
read it only from a file this command wrote. Bad input exits 2 with the error's JSON on stderr.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from .. import load_pipeline
    from ..errors import InvalidParameter, SonicError
    from . import prepare_live_face

    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    image, out = argv[0], Path(argv[1])
    try:
        try:
            params = json.loads(argv[2]) if len(argv) == 3 else {}
        except json.JSONDecodeError as e:
            raise InvalidParameter(f"the parameters are not JSON: {e}", field="params") from None
        pipeline = load_pipeline()
        options = pipeline.options(params)
        face = prepare_live_face(pipeline, image, options)
    except SonicError as e:
        print(json.dumps(e.to_dict()), file=sys.stderr)
        return 2
    tmp = out.with_suffix(out.suffix + ".part")
    tmp.write_bytes(pickle.dumps({"face": face, "options": options}))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
