// The learning-traffic class: a switch port (or NIC) queue that serves other tenants first and gives
// learning packets a bounded buffer of their own, so that under congestion they are the ones dropped.
//
// Learning packets carry a DSCP in their IPv4 header (set on the training sockets). The port's root
// queue discipline is a strict-priority PrioQueueDisc with two FIFO children: band 0 (everything
// else, served first) and band 1 (learning traffic, served only when band 0 is empty). Each band has
// its own packet limit, so a burst of learning packets cannot take the buffer from other flows.
#pragma once

#include "ns3/internet-module.h"
#include "ns3/network-module.h"
#include "ns3/traffic-control-module.h"

#include <cstdint>
#include <string>

namespace pl_lossy
{

// Band 1 for IPv4 packets whose TOS (DSCP bits) equals the learning class's, band 0 for all others.
class LearningClassFilter : public ns3::Ipv4PacketFilter
{
  public:
    static ns3::TypeId GetTypeId()
    {
        static ns3::TypeId tid = ns3::TypeId("pl_lossy::LearningClassFilter")
                                     .SetParent<ns3::Ipv4PacketFilter>()
                                     .SetGroupName("pl_lossy");
        return tid;
    }

    void SetTos(uint8_t tos)
    {
        m_tos = tos & 0xfc; // the two low bits are ECN, not class
    }

  private:
    int32_t DoClassify(ns3::Ptr<ns3::QueueDiscItem> item) const override
    {
        auto ipv4 = ns3::DynamicCast<ns3::Ipv4QueueDiscItem>(item);
        return (ipv4->GetHeader().GetTos() & 0xfc) == m_tos ? 1 : 0;
    }

    uint8_t m_tos = 0;
};

// Installs the two-band queue on every device of `ports` (which must have no root queue disc) and
// returns the root discs, so that their drops can be watched.
inline ns3::QueueDiscContainer InstallLearningClass(ns3::NetDeviceContainer ports,
                                                    uint32_t otherPackets,
                                                    uint32_t learningPackets,
                                                    uint8_t tos)
{
    ns3::TrafficControlHelper helper;
    // every priority maps to band 0: the filter, not the socket priority, decides the class
    uint16_t root = helper.SetRootQueueDisc("ns3::PrioQueueDisc",
                                            "Priomap",
                                            ns3::StringValue("0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"));
    auto bands = helper.AddQueueDiscClasses(root, 2, "ns3::QueueDiscClass");
    auto limit = [](uint32_t packets) {
        return ns3::QueueSizeValue(ns3::QueueSize(ns3::QueueSizeUnit::PACKETS, packets));
    };
    helper.AddChildQueueDisc(root, bands[0], "ns3::FifoQueueDisc", "MaxSize", limit(otherPackets));
    helper.AddChildQueueDisc(root, bands[1], "ns3::FifoQueueDisc", "MaxSize", limit(learningPackets));
    ns3::QueueDiscContainer discs = helper.Install(ports);
    for (uint32_t i = 0; i < discs.GetN(); ++i)
    {
        auto filter = ns3::CreateObject<LearningClassFilter>();
        filter->SetTos(tos);
        discs.Get(i)->AddPacketFilter(filter);
    }
    return discs;
}

} // namespace pl_lossy
