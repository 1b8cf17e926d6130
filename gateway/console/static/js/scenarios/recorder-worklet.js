// An AudioWorklet processor that hands the microphone's samples (first channel) to the page as they come.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}

registerProcessor("aimass-capture", Capture);
