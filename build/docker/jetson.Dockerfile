# Jetson Orin image (JetPack 6 / L4T r36): vila-edge on the TensorRT that JetPack ships.
#
# Build it on the Jetson itself (arm64), from the repository root:
#   docker build -f build/docker/jetson.Dockerfile -t vila-edge:jetson .
# The base's L4T release must match the device's: `cat /etc/nv_tegra_release` says e.g. "R36 (release), REVISION: 4.0"
# -> r36.4.0 (the default); for JetPack 6.0 pass --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.3.0.
#
# Deploy (README "Deploy on a Jetson"): export on any machine with `vila-edge build CKPT -o engines/x --stage export`,
# copy engines/x to the Jetson, then compile the TensorRT engines there, in this image:
#   docker run --rm --runtime nvidia -v "$PWD/engines:/engines" vila-edge:jetson build /engines/x --stage engines
#
# Cameras: the NVIDIA runtime gives the container the GPU and JetPack's GStreamer plugins (nvarguscamerasrc,
# nvvidconv). A USB camera is a device (--device /dev/video0, then --camera 0); a CSI camera is reached through
# the host's Argus daemon, whose socket must be mounted, and is opened as a GStreamer pipeline ending in appsink:
#   docker run --rm -it --runtime nvidia --network host -v /tmp/argus_socket:/tmp/argus_socket \
#     -v "$PWD/engines:/engines" vila-edge:jetson chat /engines/x --interval 2 --prompt "What do you see?" \
#     --camera "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! \
#               nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
#
# Python here is JetPack's 3.10 on arm64, for which requirements/dev.lock (CPython 3.11, x86-64) does not resolve:
# the versions are pip's for this platform within pyproject.toml's ranges, plus the two bounds below.
ARG BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${BASE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3-libnvinfer: TensorRT's Python bindings for JetPack's TensorRT (the base carries the libraries).
# python3-opencv: Ubuntu's OpenCV is built with GStreamer (CSI cameras via nvarguscamerasrc); the PyPI wheel is not.
# gstreamer1.0-plugins-*: v4l2src (USB cameras), rtspsrc (IP cameras), videoconvert.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3-pip python3-libnvinfer python3-opencv \
       gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad v4l-utils \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    VILA_EDGE_PROFILES=/opt/vila-edge/build/profiles

WORKDIR /opt/vila-edge
COPY pyproject.toml README.md ./
COPY vila_edge vila_edge
COPY build/profiles build/profiles
# numpy<2: Ubuntu's cv2 was compiled against numpy 1.x. cuda-python 12.x: JetPack 6 is CUDA 12.
# The PyPI OpenCV wheel is removed again so that `import cv2` finds Ubuntu's GStreamer build.
RUN python3 -m pip install ".[serve]" "numpy>=1.26,<2" "cuda-python>=12.4,<13" \
    && python3 -m pip uninstall -y opencv-python-headless \
    && python3 -c "import cv2, re, sys; sys.exit(0 if re.search(r'GStreamer:\s+YES', cv2.getBuildInformation()) else 'cv2 without GStreamer')" \
    && python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)" \
    && vila-edge --help >/dev/null

VOLUME ["/cache"]
ENTRYPOINT ["vila-edge"]
CMD ["--help"]
