// TcpRoundEngine: the reliable baseline. One RPS round as TCP transfers: a fresh connection per
// (sender, receiver) pair, phase and round, each carrying one block; everything arrives, and what
// differs from the lossy UDP round is when. Loaded into the simulation process with cppyy.cppdef.
//
// Connections are not kept across rounds on purpose: congestion state carried from round to round
// would make a round's outcome depend on the rounds simulated before it, and rounds must be pure
// functions of (settings, seed, round) to be simulated ahead, in parallel and replayed. Senders take
// ephemeral ports: their numbers depend on history, but no model here looks at ports. (Fixed
// ports per destination made a new SYN meet the previous round's connection and get reset.)
//
// Like RoundEngine, Start() only schedules (the downlink once every uplink transfer has completed or
// failed: two_phase_round.hpp) and the caller runs the simulator, so that other traffic shares the run.
#pragma once

#include "tcp_transfer.hpp"
#include "two_phase_round.hpp"

#include "ns3/core-module.h"
#include "ns3/internet-module.h"
#include "ns3/network-module.h"

#include <cstdint>
#include <map>
#include <vector>

namespace pl_lossy
{

class TcpRoundEngine : public TwoPhaseRound
{
  public:
    // `tos`: the IPv4 TOS of the training connections (0: none; the learning class matches on it).
    TcpRoundEngine(uint16_t port, uint8_t tos)
        : m_port(port),
          m_tos(tos)
    {
    }

    void AddHost(ns3::Ptr<ns3::Node> node, ns3::Ipv4Address address)
    {
        m_hostOf[address.Get()] = static_cast<uint32_t>(m_nodes.size());
        m_nodes.push_back(node);
        m_addresses.push_back(address);
    }

    // Schedules a round: uplink transfers (upSrc -> upDst, nUp) first, downlink transfers once the
    // uplink is over, bytesPerFlow each in segments of segmentBytes. `upCompletion`/`downCompletion`
    // get each transfer's time (seconds since its phase started; -1: its connection gave up). Run the
    // simulator, then read `finished`, `upSeconds` (when the phase's last transfer completed) and
    // `downSeconds`.
    void Start(const int32_t* upSrc,
               const int32_t* upDst,
               uint32_t nUp,
               const int32_t* downSrc,
               const int32_t* downDst,
               uint32_t nDown,
               uint64_t bytesPerFlow,
               uint32_t segmentBytes,
               double* upCompletion,
               double* downCompletion,
               const int64_t* startNs)
    {
        m_bytesPerFlow = bytesPerFlow;
        m_startNs.assign(startNs, startNs + m_nodes.size());
        Listen(segmentBytes);
        m_completionOf[0] = upCompletion;
        m_completionOf[1] = downCompletion;
        BeginRound(upSrc, upDst, nUp, downSrc, downDst, nDown);
    }

    uint64_t bytesReceived = 0;
    uint64_t failedConnections = 0;

    void ResetCounters()
    {
        bytesReceived = failedConnections = 0;
    }

  private:
    // One listener per host, made anew when the segment size changes: a listening socket's cannot
    // change, and the connections it accepts inherit it.
    void Listen(uint32_t segmentBytes)
    {
        if (segmentBytes == m_segmentBytes && !m_listeners.empty())
        {
            return;
        }
        for (auto& old : m_listeners)
        {
            old->Close();
        }
        m_listeners.clear();
        m_segmentBytes = segmentBytes;
        for (uint32_t host = 0; host < m_nodes.size(); ++host)
        {
            ns3::Ptr<ns3::Socket> listener =
                ns3::Socket::CreateSocket(m_nodes[host], ns3::TcpSocketFactory::GetTypeId());
            listener->SetAttribute("SegmentSize", ns3::UintegerValue(segmentBytes));
            listener->Bind(ns3::InetSocketAddress(ns3::Ipv4Address::GetAny(), m_port));
            if (m_tos != 0)
            {
                listener->SetIpTos(m_tos); // accepted sockets inherit it: the ACKs are learning traffic too
            }
            listener->Listen();
            listener->SetAcceptCallback(
                ns3::MakeNullCallback<bool, ns3::Ptr<ns3::Socket>, const ns3::Address&>(),
                ns3::MakeBoundCallback(&TcpRoundEngine::HandleAccept, this, host));
            m_listeners.push_back(listener);
        }
    }

    // Callbacks carry (phase, flow) so that a late event of an earlier phase's connection (its FIN)
    // is never taken for this phase's.
    static uint64_t Key(uint32_t phase, uint32_t flow)
    {
        return (static_cast<uint64_t>(phase) << 32) | flow;
    }

    void StartPhase(uint32_t phase, const Flows& flows) override
    {
        uint32_t nFlows = static_cast<uint32_t>(flows.src.size());
        m_completion = m_completionOf[phase - 1];
        std::fill(m_completion, m_completion + nFlows, -1.0);
        m_received.assign(nFlows, 0);
        m_sent.assign(nFlows, 0);
        m_unresolved = nFlows;
        m_flowOf.clear();
        m_senders.clear();
        m_accepted.clear();
        if (nFlows == 0)
        {
            EndPhase();
            return;
        }
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            m_flowOf[{static_cast<uint32_t>(flows.src[f]), static_cast<uint32_t>(flows.dst[f])}] = f;
            ns3::Ptr<ns3::Socket> s =
                ns3::Socket::CreateSocket(m_nodes[flows.src[f]], ns3::TcpSocketFactory::GetTypeId());
            s->SetAttribute("SegmentSize", ns3::UintegerValue(m_segmentBytes));
            s->Bind();
            if (m_tos != 0)
            {
                s->SetIpTos(m_tos);
            }
            s->SetConnectCallback(
                ns3::MakeBoundCallback(&TcpRoundEngine::HandleConnected, this, Key(phase, f)),
                ns3::MakeBoundCallback(&TcpRoundEngine::HandleConnectFailed, this, Key(phase, f)));
            s->SetSendCallback(ns3::MakeBoundCallback(&TcpRoundEngine::HandleSendSpace, this, Key(phase, f)));
            ns3::InetSocketAddress to(m_addresses[flows.dst[f]], m_port);
            int64_t late = phase == 1 ? m_startNs[flows.src[f]] : 0; // a straggler connects when its compute ends
            if (late == 0)
            {
                s->Connect(to);
            }
            else
            {
                ns3::Simulator::Schedule(ns3::NanoSeconds(late), &TcpRoundEngine::Connect, s, to);
            }
            m_senders.push_back(s);
        }
    }

    static void Connect(ns3::Ptr<ns3::Socket> s, ns3::InetSocketAddress to)
    {
        s->Connect(to);
    }

    // A transfer of the current phase completed (or its connection failed) now.
    void Resolve()
    {
        if (--m_unresolved == 0)
        {
            EndPhase();
        }
    }

    bool Current(uint64_t key) const
    {
        return m_phase != 0 && (key >> 32) == m_phase;
    }

    static void HandleConnected(TcpRoundEngine* self, uint64_t key, ns3::Ptr<ns3::Socket> s)
    {
        if (self->Current(key))
        {
            PushBytes(s, self->m_sent[key & 0xffffffff], self->m_bytesPerFlow);
        }
    }

    static void HandleConnectFailed(TcpRoundEngine* self, uint64_t key, ns3::Ptr<ns3::Socket>)
    {
        ++self->failedConnections;
        if (self->Current(key))
        {
            self->Resolve();
        }
    }

    static void HandleSendSpace(TcpRoundEngine* self, uint64_t key, ns3::Ptr<ns3::Socket> s, uint32_t)
    {
        if (self->Current(key))
        {
            PushBytes(s, self->m_sent[key & 0xffffffff], self->m_bytesPerFlow);
        }
    }

    static void HandleAccept(TcpRoundEngine* self, uint32_t host, ns3::Ptr<ns3::Socket> s, const ns3::Address& from)
    {
        uint32_t src = self->m_hostOf[ns3::InetSocketAddress::ConvertFrom(from).GetIpv4().Get()];
        auto it = self->m_flowOf.find({src, host});
        if (it == self->m_flowOf.end() || self->m_phase == 0)
        {
            return;
        }
        s->SetRecvCallback(
            ns3::MakeBoundCallback(&TcpRoundEngine::HandleRead, self, Key(self->m_phase, it->second)));
        self->m_accepted.push_back(s);
    }

    static void HandleRead(TcpRoundEngine* self, uint64_t key, ns3::Ptr<ns3::Socket> s)
    {
        uint64_t got = 0;
        while (ns3::Ptr<ns3::Packet> p = s->Recv())
        {
            got += p->GetSize();
        }
        self->bytesReceived += got;
        if (!self->Current(key))
        {
            return;
        }
        uint32_t flow = static_cast<uint32_t>(key & 0xffffffff);
        self->m_received[flow] += got;
        if (self->m_received[flow] >= self->m_bytesPerFlow && self->m_completion[flow] < 0)
        {
            self->m_completion[flow] = (ns3::Simulator::Now() - self->m_start).GetSeconds();
            s->Close(); // finish the connection in this round, so that its port is free in the next
            self->Resolve();
        }
    }

    uint16_t m_port;
    uint8_t m_tos;
    std::vector<ns3::Ptr<ns3::Node>> m_nodes;
    std::vector<ns3::Ipv4Address> m_addresses;
    std::map<uint32_t, uint32_t> m_hostOf;
    std::map<std::pair<uint32_t, uint32_t>, uint32_t> m_flowOf;
    std::vector<ns3::Ptr<ns3::Socket>> m_listeners;
    std::vector<ns3::Ptr<ns3::Socket>> m_senders;
    std::vector<ns3::Ptr<ns3::Socket>> m_accepted;
    std::vector<uint64_t> m_received;
    std::vector<uint64_t> m_sent;
    double* m_completionOf[2] = {nullptr, nullptr};
    uint32_t m_unresolved = 0;
    uint64_t m_bytesPerFlow = 0;
    std::vector<int64_t> m_startNs; // per host: when its uplink transfers start (stragglers)
    uint32_t m_segmentBytes = 0;
    double* m_completion = nullptr;
};

} // namespace pl_lossy
